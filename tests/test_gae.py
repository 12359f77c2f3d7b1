"""GAE: the kernel against slow oracles and hand-worked vectors, the audit, and one mutant per check."""
from __future__ import annotations

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from llmaudit.config import ConfigError
from llmaudit.registry import get_audit
from modules import gae as G
from modules import mdp as M

F64 = torch.float64


def col(values):
    return torch.tensor(values, dtype=F64)[:, None]


def slow_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Plain Python, one env and one step at a time, straight from the definition."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        carry = 0.0
        for t in reversed(range(T)):
            term, trunc = bool(terminated[t][n]), bool(truncated[t][n])
            delta = rewards[t][n] + (0.0 if term else gamma * next_values[t][n]) - values[t][n]
            carry = delta + (0.0 if (term or trunc) else gamma * lam * carry)
            adv[t][n] = carry
    return adv


batches = st.builds(
    lambda T, N, pt, pc, seed: G.random_batch(T, N, pt, pc, torch.Generator().manual_seed(seed)),
    st.integers(1, 12), st.integers(1, 5), st.floats(0, 0.5), st.floats(0, 0.5), st.integers(0, 2**31 - 1))
gammas = st.floats(0.0, 1.0)
lams = st.floats(0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Hand-worked vectors (rl-anchors.md section 3)


VERL = {"rewards": col([0, 0, 1]), "values": col([.5, .6, .7]), "next_values": col([.6, .7, 0]),
        "terminated": col([0, 0, 1]), "truncated": col([0, 0, 0])}


@pytest.mark.parametrize("gamma,lam,adv,ret", [
    (1.0, 1.0, [0.5, 0.4, 0.3], [1.0, 1.0, 1.0]),
    (0.9, 0.0, [0.04, 0.03, 0.3], [0.54, 0.63, 1.0]),
    (0.9, 1.0, [0.31, 0.30, 0.30], [0.81, 0.9, 1.0]),
    (0.9, 0.95, [0.2849575, 0.2865, 0.3], [0.7849575, 0.8865, 1.0]),
])
def test_gae_verl_vectors(gamma, lam, adv, ret):
    A, R = G.compute_gae(**VERL, gamma=gamma, lam=lam)
    torch.testing.assert_close(A, col(adv), atol=1e-12, rtol=0)
    torch.testing.assert_close(R, col(ret), atol=1e-12, rtol=0)


def test_gae_cleanrl_dones_vector():
    batch = {"rewards": col([1] * 4), "values": col([.5] * 4), "next_values": col([.5] * 4),
             "terminated": col([0, 1, 0, 0]), "truncated": col([0] * 4)}
    A, _ = G.compute_gae(**batch, gamma=0.99, lam=0.95)
    torch.testing.assert_close(A, col([1.46525, 0.5, 1.9307975, 0.995]), atol=1e-12, rtol=0)


def test_gae_truncation_bootstraps_but_termination_does_not():
    base = {"rewards": col([1.0, 1.0]), "values": col([0.0, 0.0]), "next_values": col([0.0, 10.0])}
    truncated, _ = G.compute_gae(**base, terminated=col([0, 0]), truncated=col([0, 1]), gamma=0.5, lam=1.0)
    terminated, _ = G.compute_gae(**base, terminated=col([0, 1]), truncated=col([0, 0]), gamma=0.5, lam=1.0)
    assert truncated[1].item() == 1.0 + 0.5 * 10.0
    assert terminated[1].item() == 1.0
    both, _ = G.compute_gae(**base, terminated=col([0, 1]), truncated=col([0, 1]), gamma=0.5, lam=1.0)
    assert both[1].item() == 1.0  # terminated wins
    poisoned = dict(base, next_values=col([0.0, float("nan")]))
    safe, _ = G.compute_gae(**poisoned, terminated=col([0, 1]), truncated=col([0, 0]), gamma=0.5, lam=1.0)
    assert torch.equal(safe, terminated)  # the terminal observation's value is never read


# ------------------------------------------------------------------------------------------------
# Properties of the kernel


@settings(max_examples=60, deadline=None)
@given(batches, gammas, lams)
def test_gae_equals_plain_python_per_env(batch, gamma, lam):
    A, R = G.compute_gae(**batch, gamma=gamma, lam=lam)
    lists = {k: v.tolist() for k, v in batch.items()}
    torch.testing.assert_close(A, torch.tensor(slow_gae(**lists, gamma=gamma, lam=lam), dtype=F64),
                               atol=1e-10, rtol=0)
    assert torch.equal(R, A + batch["values"])


@settings(max_examples=40, deadline=None)
@given(batches, gammas, lams)
def test_gae_equals_closed_form_and_forward_lambda_return(batch, gamma, lam):
    A, R = G.compute_gae(**batch, gamma=gamma, lam=lam)
    torch.testing.assert_close(A, G.gae_closed_form(**batch, gamma=gamma, lam=lam), atol=1e-10, rtol=0)
    forward = G.lambda_returns(batch["rewards"], batch["next_values"], batch["terminated"],
                               batch["truncated"], gamma, lam)
    torch.testing.assert_close(R, forward, atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(batches, gammas)
def test_gae_lambda_endpoints_are_td_error_and_monte_carlo(batch, gamma):
    A0, _ = G.compute_gae(**batch, gamma=gamma, lam=0.0)
    A1, _ = G.compute_gae(**batch, gamma=gamma, lam=1.0)
    td = G.td_errors(batch["rewards"], batch["values"], batch["next_values"], batch["terminated"], gamma)
    torch.testing.assert_close(A0, td, atol=1e-12, rtol=0)
    torch.testing.assert_close(A1, G.monte_carlo_advantages(**batch, gamma=gamma), atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(batches, gammas, lams, st.floats(-5, 5))
def test_gae_is_homogeneous_and_linear_in_rewards(batch, gamma, lam, scale):
    A, _ = G.compute_gae(**batch, gamma=gamma, lam=lam)
    scaled = {k: (v * scale if v.is_floating_point() else v) for k, v in batch.items()}
    torch.testing.assert_close(G.compute_gae(**scaled, gamma=gamma, lam=lam)[0], scale * A, atol=1e-9, rtol=1e-9)
    zeros = torch.zeros_like(batch["values"])
    extra = torch.ones_like(batch["rewards"])
    A_sum, _ = G.compute_gae(**dict(batch, rewards=batch["rewards"] + extra), gamma=gamma, lam=lam)
    A_extra, _ = G.compute_gae(**dict(batch, rewards=extra, values=zeros, next_values=zeros), gamma=gamma, lam=lam)
    torch.testing.assert_close(A_sum, A + A_extra, atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(batches, gammas, lams, st.data())
def test_gae_splitting_the_batch_at_a_done_changes_nothing(batch, gamma, lam, data):
    batch = {k: v[:, :1] for k, v in batch.items()}  # one env, so a done is a boundary of the whole batch
    done = (batch["terminated"] | batch["truncated"])[:, 0]
    cuts = done[:-1].nonzero().flatten().tolist()
    if not cuts:
        return
    k = data.draw(st.sampled_from(cuts)) + 1  # the first step of a new episode
    A, _ = G.compute_gae(**batch, gamma=gamma, lam=lam)
    head, _ = G.compute_gae(**{n: v[:k] for n, v in batch.items()}, gamma=gamma, lam=lam)
    tail, _ = G.compute_gae(**{n: v[k:] for n, v in batch.items()}, gamma=gamma, lam=lam)
    assert torch.equal(torch.cat([head, tail]), A)


@settings(max_examples=30, deadline=None)
@given(batches, gammas, lams)
def test_gae_float_flags_and_float32_agree(batch, gamma, lam):
    A, _ = G.compute_gae(**batch, gamma=gamma, lam=lam)
    as_float = dict(batch, terminated=batch["terminated"].to(F64), truncated=batch["truncated"].to(F64))
    assert torch.equal(G.compute_gae(**as_float, gamma=gamma, lam=lam)[0], A)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    A32, R32 = G.compute_gae(**f32, gamma=gamma, lam=lam)
    assert A32.dtype == R32.dtype == torch.float32
    torch.testing.assert_close(A32.double(), A, atol=1e-4, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(batches, gammas, lams)
def test_gae_envs_are_independent_and_permutable(batch, gamma, lam):
    A, _ = G.compute_gae(**batch, gamma=gamma, lam=lam)
    perm = torch.randperm(A.shape[1], generator=torch.Generator().manual_seed(0))
    A_perm, _ = G.compute_gae(**{k: v[:, perm] for k, v in batch.items()}, gamma=gamma, lam=lam)
    assert torch.equal(A_perm, A[:, perm])


@settings(max_examples=40, deadline=None)
@given(batches, gammas, lams)
def test_gae_is_bounded_by_the_td_errors(batch, gamma, lam):
    A, _ = G.compute_gae(**batch, gamma=gamma, lam=lam)
    td = G.td_errors(batch["rewards"], batch["values"], batch["next_values"], batch["terminated"], gamma)
    bound = td.abs().max() * A.shape[0]  # |sum_l (gamma lam)^l delta| <= T max|delta|
    assert A.abs().max() <= bound + 1e-12


# ------------------------------------------------------------------------------------------------
# Oracles and the experiment's pieces


@settings(max_examples=30, deadline=None)
@given(batches, gammas)
def test_one_step_return_is_the_td_target(batch, gamma):
    G1 = G.n_step_returns(batch["rewards"], batch["next_values"], batch["terminated"], batch["truncated"], gamma)[0]
    target = batch["rewards"] + gamma * torch.where(batch["terminated"], 0.0, batch["next_values"])
    torch.testing.assert_close(G1, target, atol=1e-12, rtol=0)


def test_episode_ends():
    term = torch.tensor([[0], [1], [0], [0], [0]], dtype=torch.bool)
    trunc = torch.tensor([[0], [0], [0], [1], [0]], dtype=torch.bool)
    assert G.episode_ends(term, trunc).flatten().tolist() == [1, 1, 3, 3, 4]


def test_episodic_mdp_is_a_valid_mdp_with_zero_terminal_value():
    g = torch.Generator().manual_seed(3)
    mdp = G.episodic_random_mdp(5, 2, 0.9, 0.1, g)
    torch.testing.assert_close(mdp.P.sum(-1), torch.ones(6, 2, dtype=F64))
    assert mdp.terminal.tolist() == [False] * 5 + [True]
    V = M.evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, M.random_policy(6, 2, g))
    assert V[-1].item() == 0.0


def test_rollout_is_deterministic_and_resets_after_termination():
    mdp = G.episodic_random_mdp(4, 2, 0.9, 0.3, torch.Generator().manual_seed(1))
    policy = M.random_policy(5, 2, torch.Generator().manual_seed(2))
    a = G.rollout(mdp, policy, 0, 1, 20, 64, 0.5, torch.Generator().manual_seed(5))
    b = G.rollout(mdp, policy, 0, 1, 20, 64, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a.rewards, b.rewards) and torch.equal(a.states, b.states)
    assert (a.states[0] == 0).all()
    assert a.terminated.any()
    assert not mdp.terminal[a.states].any()  # observations are never the terminal state (auto-reset)
    assert torch.equal(a.states[1:][~a.terminated[:-1]], a.next_states[:-1][~a.terminated[:-1]])


def test_analytic_bias_is_zero_for_the_true_value_and_at_lambda_one():
    g = torch.Generator().manual_seed(4)
    mdp = G.episodic_random_mdp(6, 3, 0.9, 0.05, g)
    policy = M.random_policy(7, 3, g)
    V = M.evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, policy)
    Q = M.q_from_v(mdp.P, mdp.R, mdp.gamma, V)
    for lam in (0.0, 0.5, 1.0):
        assert abs(G.analytic_first_step_bias(mdp, policy, V, Q, 2, 1, 50, lam)) < 1e-12
    V_hat = V + 0.5  # a constant overestimate, terminal included
    assert abs(G.analytic_first_step_bias(mdp, policy, V_hat, Q, 2, 1, 400, 1.0)) < 1e-10
    # at lam = 0 the bias is gamma * E[e(s_1); not terminal] = 0.9 * 0.5 * (1 - p_end)
    assert G.analytic_first_step_bias(mdp, policy, V_hat, Q, 2, 1, 400, 0.0) == pytest.approx(0.9 * 0.5 * 0.95)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        G.GAEConfig(gamma=1.0)
    with pytest.raises(ValueError):
        G.GAEConfig(n_lambdas=2)


# ------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_toy():
    result = audit_once("gae", "toy", 0)
    assert result.error is None, result.error
    failed = [(c.name, c.measured) for c in result.checks if not c.passed]
    assert result.passed, failed
    kinds = {c.kind for c in result.checks}
    assert kinds == {"invariant", "outcome"}
    assert result.series["advantage/variance"].x_label == r"GAE $\lambda$"


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_full(seed):
    result = audit_once("gae", "full", seed)
    failed = [(c.name, c.measured) for c in result.checks if not c.passed]
    assert result.passed, (result.error, failed)


def test_audit_is_deterministic():
    assert audit_once("gae", "toy", 3).to_dict() == audit_once("gae", "toy", 3).to_dict()


def test_overrides_reach_the_audit():
    a = audit_once("gae", "toy", 0, overrides={"n_lambdas": "5"})
    assert len(a.series["advantage/bias"].x) == 5
    with pytest.raises(ConfigError):
        audit_once("gae", "toy", 0, overrides={"n_lambda": "5"})


def test_kernel_example_and_stub():
    k = get_audit("gae").kernel("compute_gae")
    A, R = k.fn(**k.example())
    assert A.shape == R.shape == (5, 3)
    stub = k.stub("my_compute_gae.py")
    assert "def compute_gae(" in stub and "raise NotImplementedError" in stub and "truncated" in stub


# ------------------------------------------------------------------------------------------------
# Mutants: each check must fail for a plausible wrong kernel or setting


def gae_with(*, lam_fixed=None, decay="gamma_lam", bootstrap_mask="terminated", chain_cut="done",
             returns="plus_values", next_from_values=False, clip_rewards=False, any_done=False,
             gamma_in_delta=True, whiten=False):
    """A configurable wrong compute_gae (the reference when every option is left at its default)."""
    def fn(rewards, values, next_values, terminated, truncated, gamma, lam):
        lam = lam if lam_fixed is None else lam_fixed
        term, trunc = terminated.bool(), truncated.bool()
        done = term | trunc
        if clip_rewards:
            rewards = rewards.clamp(-1.0, 1.0)
        if next_from_values:  # bootstrap from the first observation of whatever comes next
            next_values = torch.cat([values[1:], next_values[-1:]])
        no_boot = {"terminated": term, "done": done, "never": torch.zeros_like(term)}[bootstrap_mask]
        g_delta = gamma if gamma_in_delta else 1.0
        deltas = rewards + g_delta * torch.where(no_boot, 0.0, next_values) - values
        T = rewards.shape[0]
        cut = {"done": done, "terminated": term,
               "next": torch.cat([done[1:], torch.zeros_like(done[:1])])}[chain_cut]
        factor = {"gamma_lam": gamma * lam, "lam": lam}[decay]
        adv = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[0])
        for t in reversed(range(T)):
            keep = torch.zeros_like(running) if (any_done and done[t].any()) else (~cut[t]).to(rewards.dtype)
            running = deltas[t] + factor * keep * running
            adv[t] = running
        if whiten:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ret = {"plus_values": adv + values, "advantages": adv}[returns]
        return adv, ret
    return fn


MUTANTS = [
    Mutant("matches_verl_test_vectors", "lam fixed at .95", {"compute_gae": gae_with(lam_fixed=0.95)}),
    Mutant("matches_cleanrl_dones_vector", "cut by the next done", {"compute_gae": gae_with(chain_cut="next")}),
    Mutant("lambda_zero_is_td_error", "lam fixed at .95", {"compute_gae": gae_with(lam_fixed=0.95)}),
    Mutant("lambda_one_is_discounted_return_minus_value", "decay lam", {"compute_gae": gae_with(decay="lam")}),
    Mutant("recursion_equals_closed_form_sum", "decay lam", {"compute_gae": gae_with(decay="lam")}),
    Mutant("returns_are_lambda_returns", "whitened", {"compute_gae": gae_with(whiten=True)}),
    Mutant("returns_equal_advantages_plus_values", "returns = A", {"compute_gae": gae_with(returns="advantages")}),
    Mutant("no_leak_across_episode_boundary", "cut on terminated only",
           {"compute_gae": gae_with(chain_cut="terminated")}),
    Mutant("truncation_bootstraps_from_next_value", "no bootstrap at truncation",
           {"compute_gae": gae_with(bootstrap_mask="done")}),
    Mutant("truncation_bootstraps_from_next_value", "next value from values[t+1]",
           {"compute_gae": gae_with(next_from_values=True)}),
    Mutant("termination_does_not_bootstrap", "bootstraps at termination",
           {"compute_gae": gae_with(bootstrap_mask="never")}),
    Mutant("linear_in_rewards", "rewards clipped", {"compute_gae": gae_with(clip_rewards=True)}),
    Mutant("envs_are_independent", "any done cuts every env", {"compute_gae": gae_with(any_done=True)}),
    Mutant("variance_grows_with_lambda", "lam fixed at .95", {"compute_gae": gae_with(lam_fixed=0.95)}),
    Mutant("bias_vanishes_at_lambda_one", "bootstraps at termination",
           {"compute_gae": gae_with(bootstrap_mask="never")}),
    Mutant("bias_shrinks_with_lambda", "lam fixed at .95", {"compute_gae": gae_with(lam_fixed=0.95)}),
    Mutant("monte_carlo_bias_matches_analytic", "cut on terminated only, bootstraps at termination",
           {"compute_gae": gae_with(chain_cut="terminated", bootstrap_mask="never")}),
    Mutant("perfect_critic_is_unbiased_for_every_lambda", "no gamma in delta",
           {"compute_gae": gae_with(gamma_in_delta=False)}),
    Mutant("bias_shrinks_with_lambda", "a perfect critic", overrides={"critic_offset": "0.0", "critic_noise": "0.0"}),
    Mutant("variance_grows_with_lambda", "a short horizon", overrides={"gamma": "0.3"}),
]


def test_reference_options_reproduce_the_reference():
    batch = G.random_batch(10, 4, 0.2, 0.2, torch.Generator().manual_seed(0))
    for a, b in zip(gae_with()(**batch, gamma=0.9, lam=0.8), G.compute_gae(**batch, gamma=0.9, lam=0.8)):
        assert torch.equal(a, b)


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("gae", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("gae", MUTANTS)
