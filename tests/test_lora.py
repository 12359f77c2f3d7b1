"""LoRA: the lora_forward / merge_lora kernels, the adapters on the tiny Llama, and the audit with its mutants."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.lora import lora as M


def _case(seed: int, d_in: int, d_out: int, r: int, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(d_out, d_in, generator=g, dtype=dtype),
            "lora_A": torch.randn(r, d_in, generator=g, dtype=dtype),
            "lora_B": torch.randn(d_out, r, generator=g, dtype=dtype), "scaling": 16 / r}


# --- kernels ----------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12), st.integers(1, 12), st.integers(1, 6))
def test_lora_forward_is_x_times_merged_weight(seed, d_in, d_out, r):
    case = _case(seed, d_in, d_out, r)
    x = torch.randn(3, 2, d_in, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    expected = x @ (case["weight"] + case["scaling"] * case["lora_B"] @ case["lora_A"]).T
    torch.testing.assert_close(M.lora_forward(x, **case), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x @ M.merge_lora(**case).T, expected, atol=1e-10, rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8))
def test_merge_then_unmerge_returns_w0(seed, r):
    case = _case(seed, 9, 7, r)
    merged = M.merge_lora(**case)
    back = M.merge_lora(merged, case["lora_A"], case["lora_B"], -case["scaling"])
    torch.testing.assert_close(back, case["weight"], atol=1e-12, rtol=0)


def test_unmerge_is_bit_exact_when_the_update_is_exact():
    # integers times a power of two: W0 + D and (W0 + D) - D are exact in float32
    W = torch.arange(12.0).reshape(3, 4)
    A, B = torch.ones(2, 4), torch.full((3, 2), 0.5)
    merged = M.merge_lora(W, A, B, 2.0)
    assert torch.equal(merged, W + 2.0) and torch.equal(M.merge_lora(merged, A, B, -2.0), W)


def test_merge_lora_does_not_modify_its_input():
    case = _case(0, 5, 4, 2)
    before = case["weight"].clone()
    M.merge_lora(**case)
    assert torch.equal(case["weight"], before)


def test_scaling_and_param_count():
    assert M.lora_scaling(16, 4) == 4.0 and M.lora_scaling(16, 4, use_rslora=True) == 8.0
    assert M.lora_scaling(8, 64, True) == pytest.approx(1.0)
    assert M.lora_param_count(4096, 4096, 8) == 65536  # 8 (4096 + 4096): 0.39 % of the 16.8M matrix
    assert M.lora_param_count(64, 32, 4) == 384


def test_lora_linear_init_follows_peft():
    """A from kaiming_uniform_(a=sqrt(5)) -- U(-1/sqrt(d_in), 1/sqrt(d_in)) -- and B zeros."""
    base = torch.nn.Linear(64, 32, bias=False)
    layer = M.LoRALinear(base, 8, 16.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.lora_B, torch.zeros(32, 8))
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    ref = torch.empty(8, 64)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))  # PEFT's call: the same distribution, same bound
    assert ref.abs().max() <= bound
    assert layer.scaling == 2.0


def test_add_lora_freezes_the_base_and_counts_by_formula():
    cfg = M.LoRAConfig.toy()
    model = M.Transformer(M.model_config(cfg), generator=torch.Generator().manual_seed(0))
    added = M.add_lora(model, 4, 8.0, "q_proj,k_proj,v_proj,o_proj,gate_proj")
    assert len(added) == 5 * cfg.n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert M.trainable_parameters(model) == sum(M.lora_param_count(m.base.weight.shape[1], m.base.weight.shape[0], 4)
                                                for m in added)


def test_merged_forward_skips_the_adapter_and_unmerge_restores_it():
    cfg = M.LoRAConfig.toy()
    g = torch.Generator().manual_seed(1)
    model = M.Transformer(M.model_config(cfg), generator=g)
    M.add_lora(model, 4, 8.0, generator=g)
    for m in M.adapters(model):
        m.lora_B.data.normal_(0, 0.1, generator=g)
    x = M.task_batch(cfg, "swap", 8, g)[0]
    with torch.no_grad():
        y = model(x)
        M.merge_all(model)
        assert all(m.merged for m in M.adapters(model))
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
        M.unmerge_all(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)


def test_swap_task_targets():
    cfg = M.LoRAConfig.toy()
    inputs, targets = M.task_batch(cfg, "swap", 64, torch.Generator().manual_seed(0))
    n = cfg.n_items
    x, y = inputs[:, 1:n + 1], targets[:, n + 1:]
    expected = torch.where(x < 2 * cfg.n_swaps, x ^ 1, x)  # 0<->1, 2<->3, 4<->5; 6..9 stay
    assert torch.equal(y, expected) and (targets[:, :n + 1] == -100).all()
    assert torch.equal(M.task_batch(cfg, "copy", 4, torch.Generator().manual_seed(0))[1][:, n + 1:],
                       M.task_batch(cfg, "copy", 4, torch.Generator().manual_seed(0))[0][:, 1:n + 1])


# --- the audit -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_result():
    return audit_once("lora", "toy", 0)


def test_audit_passes_toy(toy_result):
    assert toy_result.passed, [(c.name, c.measured) for c in toy_result.checks if not c.passed] or toy_result.error
    assert {c.kind for c in toy_result.checks} == {"invariant", "outcome"}


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("lora", "full", 1)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error
    assert "sweep/exact_match" in result.series


def test_same_seed_same_result(toy_result):
    assert audit_once("lora", "toy", 0).deterministic_dict() == toy_result.deterministic_dict()


# --- mutants ------------------------------------------------------------------------------------------------


def merge_without_scaling(weight, lora_A, lora_B, scaling):
    return weight + lora_B @ lora_A


def merge_in_bfloat16(weight, lora_A, lora_B, scaling):
    """Merging in half precision: W0's low bits are lost and unmerge cannot bring them back."""
    return (weight.bfloat16() + (lora_B @ lora_A * scaling).bfloat16()).float()


def forward_detached(x, weight, lora_A, lora_B, scaling):
    return F.linear(x, weight) + F.linear(F.linear(x, lora_A.detach()), lora_B.detach()) * scaling


ORIGINAL_INIT = M.LoRALinear.__init__


def init_b_random(self, base, r, alpha, **kwargs):
    """Both A and B random: the model no longer starts at the base."""
    ORIGINAL_INIT(self, base, r, alpha, **kwargs)
    with torch.no_grad():
        self.lora_B.uniform_(-0.5, 0.5)


def freeze_matrices_only(model):
    """Freezes the weight matrices but leaves the RMSNorm gains trainable."""
    for p in model.parameters():
        if p.dim() >= 2:
            p.requires_grad_(False)


MUTANTS = [
    Mutant("output_equals_base_at_init", "B random at init",
           patch=lambda: mock.patch.object(M.LoRALinear, "__init__", init_b_random)),
    Mutant("merged_weights_match_unmerged_adapter", "merge drops the scaling", {"merge_lora": merge_without_scaling}),
    Mutant("unmerge_restores_base_weights", "merge in bfloat16", {"merge_lora": merge_in_bfloat16}),
    Mutant("only_adapters_receive_gradients", "A and B detached", {"lora_forward": forward_detached}),
    Mutant("only_adapters_receive_gradients", "base not frozen",
           patch=lambda: mock.patch.object(M, "freeze_base", lambda model: None)),
    Mutant("trainable_count_matches_formula", "norm gains left trainable",
           patch=lambda: mock.patch.object(M, "freeze_base", freeze_matrices_only)),
    Mutant("full_finetuning_learns_the_new_task", "base already trained on the new task",
           overrides={"base_task": "swap"}),
    Mutant("lora_matches_full_finetuning", "LoRA learning rate 0", overrides={"lora_lr": "0"}),
    Mutant("merged_model_keeps_its_accuracy", "merge drops the scaling", {"merge_lora": merge_without_scaling}),
    Mutant("rslora_lets_higher_rank_move_further", "rsLoRA flag ignored",
           patch=lambda: mock.patch.object(M, "lora_scaling", lambda alpha, r, use_rslora=False: alpha / r)),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("lora", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("lora", MUTANTS)
