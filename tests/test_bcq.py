"""bcq module: the action filter (d3rlpy vectors and properties), the BCQ target and policies on the
shared offline data, the audit, and one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.bcq import bcq as M

DT = torch.float64
FAST = settings(max_examples=40, deadline=None)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=DT)


cases = st.builds(lambda B, A, seed: (torch.randn(B, A, generator=torch.Generator().manual_seed(seed), dtype=DT) * 3,
                                      torch.randn(B, A, generator=torch.Generator().manual_seed(seed + 1), dtype=DT) * 2),
                  st.integers(1, 32), st.integers(2, 6), st.integers(0, 2**31 - 1))
taus = st.floats(0.01, 0.99)


def test_filter_d3rlpy_vectors():
    q, logits = t([1.0, 5.0, 10.0]), t([0.6, 0.3, 0.1]).log()
    assert M.bcq_filter_actions(q, logits, 0.3).tolist() == [1]
    assert M.bcq_filter_actions(t([5.0, -1.0, 10.0]), t([0.05, 0.9, 0.05]).log(), 0.3).tolist() == [1]  # d3rlpy#221


def test_filter_is_strict():
    """G = [.5, .25, .25]: the ratio .5 equals tau = .5 exactly (in log space) and must not pass."""
    logits = t([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert M.bcq_filter_actions(t([0.0, 9.0, 9.0]), logits, 0.5).tolist() == [0]


@FAST
@given(cases, taus)
def test_chosen_action_passes_and_is_the_best_allowed(case, tau):
    q, logits = case
    a = M.bcq_filter_actions(q, logits, tau)
    G = torch.softmax(logits, -1)
    ratio = G / G.max(-1, keepdim=True).values
    assert (ratio.gather(-1, a[:, None]) > tau).all()
    best_allowed = torch.where(ratio > tau, q, -math.inf).max(-1).values
    assert torch.equal(q.gather(-1, a[:, None]).squeeze(-1), best_allowed)


@FAST
@given(cases, taus, st.floats(-50, 50), st.floats(0.1, 10))
def test_filter_ignores_logit_shifts_and_monotone_q_rescaling(case, tau, shift, scale):
    q, logits = case
    a = M.bcq_filter_actions(q, logits, tau)
    assert torch.equal(M.bcq_filter_actions(q, logits + shift, tau), a)
    assert torch.equal(M.bcq_filter_actions(q * scale + shift, logits, tau), a)


@FAST
@given(cases)
def test_filter_limits_are_dqn_and_behaviour_cloning(case):
    q, logits = case
    assert torch.equal(M.bcq_filter_actions(q, logits, 1e-12), q.argmax(-1))
    assert torch.equal(M.bcq_filter_actions(q, logits, 1 - 1e-9), logits.argmax(-1))


def test_config_rejects_tau_outside_the_open_interval():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            M.BCQConfig(tau=bad)


@pytest.fixture(scope="module")
def result():
    cfg = M.BCQConfig.toy()
    return cfg, M.run(cfg, torch.Generator().manual_seed(0))


def test_policies_are_the_filtered_argmax(result):
    cfg, r = result
    for k in r.select("bcq"):
        m = r.models[k]
        want = M.bcq_filter_actions(r.run.q[k], r.bc_logits[m.dataset], cfg.tau)
        assert torch.equal(r.policies[k].argmax(-1), want)
    for k in r.select("dqn"):
        assert torch.equal(r.policies[k].argmax(-1), r.run.q[k].argmax(-1))


def test_expert_data_bcq_is_near_optimal(result):
    _, r = result
    assert r.returns(r.select("bcq", 2)) > 0.9 * r.env.optimal_return


# ---------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_toy():
    result = audit_once("bcq", "toy", 0)
    assert result.passed, [(c.name, c.measured, c.error) for c in result.checks if not c.passed]
    assert {c.kind for c in result.checks} == {"invariant", "outcome"}


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("bcq", "full", 1)
    assert result.passed, [(c.name, c.measured, c.error) for c in result.checks if not c.passed]


def test_audit_is_deterministic():
    only = ["chosen_action_passes_the_filter", "tau_to_zero_is_argmax_q"]
    assert audit_once("bcq", "toy", 2, only=only).to_dict() == audit_once("bcq", "toy", 2, only=only).to_dict()


# ---------------------------------------------------------------------------------------------------
# Mutants


def filter_with(*, relative=True, shift=True, mask=True, choose="max", keep_only_best_g=False):
    """A configurable wrong bcq_filter_actions (the reference when every option is left at its default)."""
    def fn(q_values, behavior_logits, tau):
        log_probs = torch.log_softmax(behavior_logits, dim=-1)
        if keep_only_best_g:
            return log_probs.argmax(-1)
        ref = log_probs.max(-1, keepdim=True).values if relative else 0.0
        allowed = (log_probs - ref > math.log(tau)).to(q_values.dtype)
        q = q_values if choose == "max" else -q_values
        score = q - q.min(-1, keepdim=True).values + 1e-5 if shift else q
        return (score * allowed if mask else score).argmax(-1)
    return fn


MUTANTS = [
    Mutant("filter_matches_d3rlpy_vectors", "absolute threshold G > tau",
           {"bcq_filter_actions": filter_with(relative=False)}),
    Mutant("sole_survivor_with_lowest_q_is_chosen", "raw Q times the mask",
           {"bcq_filter_actions": filter_with(shift=False)}),
    Mutant("chosen_action_passes_the_filter", "mask ignored", {"bcq_filter_actions": filter_with(mask=False)}),
    Mutant("tau_to_zero_is_argmax_q", "behaviour cloning", {"bcq_filter_actions": filter_with(keep_only_best_g=True)}),
    Mutant("tau_to_one_is_behaviour_cloning", "mask ignored", {"bcq_filter_actions": filter_with(mask=False)}),
    Mutant("bcq_never_picks_an_action_unseen_in_that_state", "mask ignored",
           {"bcq_filter_actions": filter_with(mask=False)}),
    Mutant("bcq_beats_behaviour_cloning_on_medium", "behaviour cloning",
           {"bcq_filter_actions": filter_with(keep_only_best_g=True)}),
    Mutant("bcq_beats_behaviour_policy_on_medium", "lowest Q among the allowed",
           {"bcq_filter_actions": filter_with(choose="min")}),
    Mutant("tau_near_one_returns_what_behaviour_cloning_returns", "mask ignored",
           {"bcq_filter_actions": filter_with(mask=False)}),
]


def test_reference_options_reproduce_the_reference():
    g = torch.Generator().manual_seed(0)
    q, logits = torch.randn(64, 4, generator=g, dtype=DT), torch.randn(64, 4, generator=g, dtype=DT)
    assert torch.equal(filter_with()(q, logits, 0.3), M.bcq_filter_actions(q, logits, 0.3))


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("bcq", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("bcq", MUTANTS)
